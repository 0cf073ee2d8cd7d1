"""HSAE Forest trainer: language model loading, activations, HSAE models, training, evaluation, indexing."""
