"""The parts of btm's trainer; ``fairseq_ext.train`` is the entry (``train_lm``) and its docstring
says how the parts fit together.

- ``setup``: the spec checked; device, precision, process group, batch split, seeds, dictionary;
- ``resume``: build or resume the model, optimizer, loss scaler and data stream;
- ``step``: one update (forward, backward, accumulation, clipping, optimizer step);
- ``torch_compile``: torch.compile around the step, and when it falls back to eager mode;
- ``schedule``: per-update numbers (learning rate, dropout seeds);
- ``checkpoints``, ``validation``, ``save_dir``: what a save point writes and logs;
- ``tensorboard_log``: the log's scalars as TensorBoard events (``TrainSpec.tensorboard``);
- ``preemption``: the stop signal and the ranks' agreement on it;
- ``loop``: the update loop that ties them together.
"""
