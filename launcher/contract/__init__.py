"""What every layer of btm agrees on, with no torch or fairseq: errors, atomic writes, safe
names, model presets, the run-directory layout, the files on disk (forest manifest, results
tables; each with one reader and one writer) and the registry of evaluation methods.

Everything else imports from here; nothing here imports from the rest of btm.
"""
