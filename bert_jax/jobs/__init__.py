"""The command-line jobs, one module each: `./launch.sh <job>` runs `python -m bert_jax.jobs.<job>`."""
