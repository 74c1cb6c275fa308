#!/bin/bash

# Parameters
#SBATCH --account=my-project
#SBATCH --constraint=volta32gb
#SBATCH --cpus-per-task=10
#SBATCH --dependency=afterok:1001
#SBATCH --gpus-per-node=8
#SBATCH --job-name=paper-125m.seed
#SBATCH --kill-on-invalid-dep=yes
#SBATCH --mail-type=FAIL
#SBATCH --mem=480G
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=/scratch/runs/paper/jobs/logs/%j_0_log.out
#SBATCH --partition=learnfair
#SBATCH --qos=normal
#SBATCH --requeue
#SBATCH --signal=B:USR2@180
#SBATCH --time=4320
#SBATCH --wckey=btm

# setup
export PYTHONPATH=/opt/btm${PYTHONPATH:+:$PYTHONPATH}

# command
exec /opt/btm/.venv/bin/python -u -m launcher stage /scratch/runs/paper seed --nproc-per-node 8
