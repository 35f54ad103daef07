"""Crystal structure -> CGCNN graph (``converter``), the element encoding (``encoding``) and
batching graphs for the model (``batch``)."""
