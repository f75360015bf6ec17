"""Orchestration: runs, summarises, plots and writes reports by calling the layers below
(``experiments`` for training, evaluation and records, ``analysis`` for measurements,
``viz`` to draw the plain data it is handed). The command line calls these.

- ``study``: ``write_study_outputs`` (results.md, plots/*.png, report.html of a study)
- ``extension``: ``write_extension_outputs`` and ``extension_report_section`` (``posenc extend``)
- ``report``: ``write_report`` (measures, runs the sentence tests, trains the attention
  models, loads the pretrained model, reads a study; hands the data to
  ``viz.report.render_report``); ``conclusions``: a study's conclusions in sentences
- ``figures``: figures of trained and pretrained models, and ``plot`` (``posenc plot``)
"""
