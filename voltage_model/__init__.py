"""What a served model is: everything between a crystal structure and its predicted voltage.

Structure reading (``structures``, ``cif``), the crystal graph (``graphs``: converter, element
encoding, batching), the model classes and heads (``models``: CGCNN, GP head, composition
descriptors, CHGNet backbone, CHGNet physics voltage), the self-describing checkpoint
(``artifact``), the one prediction pass (``predict``), local voltages (``local_voltage``), the
pretrained release reader (``release``), the drift statistics the pipeline's reference and the
service's windows share (``drift``), the MLflow pyfunc (``pyfunc``) and the names a model is
registered and served by (``naming``).

Import rule (tests/project/test_architecture.py, docs/architecture.md): this package imports neither
``training`` nor ``serving``; both import it. Nothing is imported here, so ``import
voltage_model.naming`` stays cheap.
"""
