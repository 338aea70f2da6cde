"""The Slurm backend: pure parsers of Slurm's output (``parse``) and ``SlurmClient`` over a Transport."""
