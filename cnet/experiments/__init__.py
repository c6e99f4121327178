"""The experiments behind the notebooks: settings of the one training loop
(:func:`cnet.train.train`) run over seeds, and sweeps of a trained ControlNet's sampling, each
measured by the one fidelity definition.

=============  ============================================================================
module         what it holds
=============  ============================================================================
recipe         the recipe study: which settings make every seed follow its condition
               (notebook 05; the quick profile is its choice)
profiles       a profile as it stands (the full one) over seeds, by the study's rules
ablate         the paper's ablations over seeds: their runs, measures and summary (07)
ledger         the claim ledger: each claim the ablations test, its paired effect and verdict (07)
first_updates  updates 1-2-3 of a real run, per parameter group, exactly (07)
compare        runs that differ in one setting, side by side
control        control on a trained ControlNet: strength, timing, the empty prompt, transfer (06)
composition    two ControlNets at once on two-object scenes (06)
methods        ControlNet and the methods that followed it, side by side (08)
=============  ============================================================================
"""
