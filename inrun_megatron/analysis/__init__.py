"""Offline analysis of score dumps: the library behind the ``inrun-scores`` command.

* ``dump``      open a score dump (records.py's format), check every part against the manifest
* ``merge``     out-of-core (and MPI) merge into accumulated per-sample values
* ``values``    the merged format and its reader, the sample-id hash both use
* ``inputs``    a command's input (dump or merged directory) and the run's sample index
* ``views``     step-aware views of the values (docs/DESIGN.md §1.6), computed out of core
* ``stats``     top-k, distributions, rank correlations in bounded memory
* ``commands``  one function per command, each returning a ``report.Report``
* ``plots``     the PNG figures; ``report`` rich/JSON output and atomic output files
* ``cli``       the argument parser; ``bench`` and ``synthetic`` the benchmark and its dumps
"""
