"""The job store: jobs, documents and the tracker that folds job events into them."""
