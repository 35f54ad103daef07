"""Screening: rank many candidate electrode structures by predicted voltage, per working ion.

``run_screen`` reads a folder or a ``.tar(.gz)``/``.zip`` of CIF / POSCAR / pymatgen-JSON files,
predicts voltage and uncertainty with one model per ion, and writes, next to ``out_csv``:

* ``<out>.partial.jsonl``: append-only progress, one JSON line per input id (prediction or error).
  It is the source of truth: a rerun with ``resume=True`` skips every id already in it, so an
  interrupted job (pre-empted Slurm task, evicted pod) loses at most one batch.
* ``<out>.csv``: the ranked table (rank within ion, id, formula, ion, voltage, uncertainty,
  out-of-domain warnings); ``<out>.errors.csv``: files that could not be used and why;
  ``summary_json``: count and share above the threshold per ion (the paper's headline numbers).

Sharding: ``shard=(i, n)`` keeps the ids whose sha256 falls in bucket i of n.  A hash, rather than
a stride over the sorted list, means a file's shard depends on its own name only: adding files
to the input never moves the others between shards, so every shard's partial file stays valid for
``resume``.  ``merge_screen`` (``merge.py``) checks the shards cover 0..n-1 exactly once and are
complete.

Two tiers (``serving.screen.tiers``): the fast path (``predictor.py``) reproduces the CGCNN
ensemble only. For an ion whose champion is CGCNN-only that is the champion's answer (tier 1,
final). For an ion whose champion serves a CHGNet head (alone or blended), the fast path gives the
CGCNN ensemble stored in the same artifact, labelled ``tier1_cgcnn_estimate``; after tier 1 the
champion as served re-scores that ion's ``rescore_top`` highest and ``rescore_uncertain`` most
uncertain structures (tier 2, appended to the partial file as ``{"id", "tier2": {ion: ...}}``
lines). Every row says which tier produced its figure and keeps the tier-1 figure beside it.

Engines: ``run_screen`` (``run.py``) owns what decides the outputs (selection, resume, partial
file, tier-2 plan, CSVs, summary); where the batches run is an ``Engine``: ``LocalEngine`` (this
machine, a process pool) or ``serving.screen.ray_engine.RayEngine`` (a Ray cluster). Both run the
same batches through the same functions (``screen_chunk``, ``tiers.Rescorer``), so the outputs do
not depend on the engine, and a partial file written by one is resumed by the other.

Throughput: pymatgen's CIF parser costs ~10 ms per structure, more than graph building and
inference together, so CIFs in the plain P1 layout that pymatgen and Materials Project write are
read by a small exact-path parser (``fast_p1_cif``, ``voltage_model/cif.py``) that falls back to
pymatgen for anything else; parsing and graph building run in a process pool while the parent
runs the model.

Screening is inference: champions are read as the service reads them (``voltage_model.registry``,
the checkpoint alone, weights-only; no logged code is executed) and the prediction pass is
``voltage_model``'s (``ensemble_volts``; tier 2 ``LoadedModel.predict_served``). Modules:

* ``inputs``: structure files of a folder / archive, their bytes in storage order, sharding;
* ``prepare``: bytes -> checked graphs, and the worker state that runs ``screen_chunk``;
* ``models``: champions, checkpoint files, ``model_ident`` (the same model, for ``resume``);
* ``predictor``: the tier-1 pass (``Predictor``); ``tiers``: tier-2 selection and re-scoring;
* ``partial``: the partial file; ``outputs``: ranked CSV, errors CSV, summary, report lines;
* ``run``: ``run_screen`` and the local engine; ``ray_engine``: the Ray engine (Ray optional);
* ``merge``: ``merge_screen``.

Command line: ``voltage-serve screen`` and ``voltage-serve screen-merge`` (``serving/cli.py``).
Nothing is imported here, so importing a submodule costs only what that submodule needs.
"""
