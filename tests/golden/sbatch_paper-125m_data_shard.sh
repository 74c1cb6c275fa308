#!/bin/bash

# Parameters
#SBATCH --account=my-project
#SBATCH --constraint=volta32gb
#SBATCH --cpus-per-task=16
#SBATCH --dependency='afterok:<data_plan>'
#SBATCH --job-name=paper-125m.data_shard
#SBATCH --kill-on-invalid-dep=yes
#SBATCH --mail-type=FAIL
#SBATCH --mem=64G
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=/scratch/runs/paper/jobs/submitit/%j_0_log.out
#SBATCH --partition=learnfair
#SBATCH --qos=normal
#SBATCH --requeue
#SBATCH --signal=B:USR2@180
#SBATCH --time=240
#SBATCH --wckey=btm

# setup
export PYTHONPATH=/opt/btm${PYTHONPATH:+:$PYTHONPATH}

# command
export SUBMITIT_EXECUTOR=slurm
exec /opt/btm/.venv/bin/python -u -m submitit.core._submit /scratch/runs/paper/jobs/submitit
