"""embedserve trainer: self-supervised pretraining of text encoders, evaluation and export."""
