"""The experiments behind the notebooks, each a set of settings of the one training loop
(:func:`cnet.train.train`) run over seeds and measured the same way.

=============  ============================================================================
module         what it holds
=============  ============================================================================
recipe         the recipe study: which settings make every seed follow its condition
               (notebook 05; the quick profile is its choice)
ablate         the paper's ablations over seeds: their runs, measures and summary (07)
first_updates  updates 1-2-3 of a real run, per parameter group, exactly (07)
compare        runs that differ in one setting, side by side
=============  ============================================================================
"""
