"""logq.tasks (in progress)"""
