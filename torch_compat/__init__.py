"""torch_compat: a PyTorch Lightning callback that computes through jaxnorm."""
