"""Generators of hostile and unlucky inputs for mexc (issue #14): pickles, checkpoint carriers, mutators.

* :mod:`hostile.pickles`: a pickle assembler (opcode level, protocols 2-5), a catalogue of payloads whose action is
  a canary file, and :func:`hostile.pickles.inject` that places a payload before / inside / after the data of a
  real pickle;
* :mod:`hostile.carriers`: real Megatron checkpoints (legacy ``model_optim_rng.pt``, ``common.pt``, DCP
  ``.metadata``, the in-DCP ``common_state`` item, a DCP tensor chunk) with a payload put in them;
* :mod:`hostile.mutate`: the metadata mutator (declared sizes, offsets, lengths, shapes, chunk tilings, paths of a
  torch_dist checkpoint; storages, views and rank layouts of a legacy one);
* :mod:`hostile.forkserver`: runs ``mexc`` cases in forked, resource-limited children of one warm process, and
  checks each outcome (:func:`hostile.forkserver.problems`).
"""
