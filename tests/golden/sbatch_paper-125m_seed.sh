#!/bin/bash

# Parameters
#SBATCH --account=my-project
#SBATCH --constraint=volta32gb
#SBATCH --cpus-per-task=80
#SBATCH --dependency=afterok:1001
#SBATCH --gpus-per-node=8
#SBATCH --job-name=paper-125m.seed
#SBATCH --kill-on-invalid-dep=yes
#SBATCH --mail-type=FAIL
#SBATCH --mem=480G
#SBATCH --nodes=2
#SBATCH --open-mode=append
#SBATCH --output=/scratch/runs/paper/jobs/submitit/%j_0_log.out
#SBATCH --partition=learnfair
#SBATCH --qos=normal
#SBATCH --requeue
#SBATCH --signal=B:USR2@180
#SBATCH --time=4320
#SBATCH --wckey=btm

# setup
export PYTHONPATH=/opt/btm${PYTHONPATH:+:$PYTHONPATH}
export BTM_COLLECTIVE_TIMEOUT_S=600

# command
export SUBMITIT_EXECUTOR=slurm
exec /opt/btm/.venv/bin/python -u -m submitit.core._submit /scratch/runs/paper/jobs/submitit
