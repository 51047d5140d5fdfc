"""Build the event data set: ``python launch/make_dataset.py --out DIR --ttbar-events N ...``.

Runs locally with its own Ray, or on a cluster with
``ray job submit --working-dir . -- python launch/make_dataset.py ...``; see
``python launch/make_dataset.py --help`` for every option and ``data_prep.ray_job`` for the job.
"""

from data_prep.ray_job import main

if __name__ == "__main__":
    main()
