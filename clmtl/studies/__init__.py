"""Studies over many runs, which only benchmark scripts import: grids of strategies x seeds, tuning, engines
(local processes or Ray), tables across seeds, significance tests, published protocols and Avalanche's reference."""
