"""Training: the cell stage (`cells`), the MIL head (`mil`), mosaic-slide MIL (`mosaic`), recipes (`recipe`),
datasets (`data`) and multi-process DDP helpers (`ddp`)."""
