"""Training data for the cell stage: labelled patches (ImageFolder / PCam tars), augmentation, region crops."""
