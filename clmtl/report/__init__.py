"""What a run reports: the ``results.json`` contract, ``report.md`` with its plots, the per-epoch CSV."""
