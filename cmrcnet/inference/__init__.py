"""Inference: predictions for the test spots of a fold (retrieval for CMRCNet/BLEEP, regression otherwise)."""
