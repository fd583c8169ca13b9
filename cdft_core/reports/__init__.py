"""``cdft report``: what a set of runs, cross-validations and grids found, as tables, plots,
paired comparisons and one self-contained HTML page.

The pieces, each one idea: :mod:`.collect` finds and reads run directories,
:mod:`.rows` groups complete runs into the table's rows, :mod:`.predictions` reads a
run's per-image predictions (ROC), :mod:`.table` renders the results table,
:mod:`.compare` runs the paired tests, :mod:`.plots` draws the figures, :mod:`.html`
assembles ``report.html`` and :mod:`.build` writes everything into the output directory.
"""
