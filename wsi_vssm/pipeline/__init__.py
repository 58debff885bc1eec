"""From a slide to predictions: region extraction into token-cell features (`extract`), the feature store
(`store`), region and cell geometry (`geometry`), and one slide's prediction and outputs (`predict`)."""
