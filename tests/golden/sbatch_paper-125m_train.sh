#!/bin/bash

# Parameters
#SBATCH --account=my-project
#SBATCH --array=0-15%8
#SBATCH --constraint=volta32gb
#SBATCH --cpus-per-task=20
#SBATCH --dependency=afterok:1002
#SBATCH --gpus-per-node=2
#SBATCH --job-name=paper-125m.train
#SBATCH --kill-on-invalid-dep=yes
#SBATCH --mail-type=FAIL
#SBATCH --mem=120G
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=/scratch/runs/paper/jobs/submitit/%A_%a_0_log.out
#SBATCH --partition=learnfair
#SBATCH --qos=normal
#SBATCH --requeue
#SBATCH --signal=B:USR2@180
#SBATCH --time=4320
#SBATCH --wckey=btm

# setup
export PYTHONPATH=/opt/btm${PYTHONPATH:+:$PYTHONPATH}

# command
export SUBMITIT_EXECUTOR=slurm
exec /opt/btm/.venv/bin/python -u -m submitit.core._submit /scratch/runs/paper/jobs/submitit
