"""Where models and data come from: torchvision, python factories, builtins, local files."""
