"""Using a trained model outside a run: predicting, embedding (and exporting, explaining).

Every command here opens a model the same way (:func:`model_loading.load_trained`) and
preprocesses images with the checkpoint's own data config, so its numbers agree with
``cdft eval``. The submodules are imported by their commands only (torch is heavy).
"""
