"""Cohort runs: the runner (`runner`), per-slide state and locks (`state`), one slide's execution (`execute`),
the jobs (`jobs`), Dask (`dask`), cohort tables (`cohort`) and evaluation (`evaluate`)."""
