"""Models as single-device PyTorch modules: the decoder trunk (decoder.py) and the models of the families
built on it or beside it, each with its config section and FLOPs. How a model is checked, trained and
split over devices is its family's (megalatent/families/)."""
