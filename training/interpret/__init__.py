"""What a trained model learned (paper Fig. 3) and per-atom local voltages for the service.

* ``local_fit``: fitting the linear local-voltage head (the head itself and ``explain``,
  which the service applies, are ``voltage_model.local_voltage``).
* ``activations``: one pass of a checkpoint over a data set (atom vectors, means, predictions).
* ``elements``: element embeddings, PCA and Spearman correlations with elemental properties.
* ``environments``: oxygen-coordinated sites, per-element medians, PCA / t-SNE maps.
* ``plots`` and ``stage``: the figures and the ``interpret`` pipeline stage.

Submodules are imported on use.
"""
