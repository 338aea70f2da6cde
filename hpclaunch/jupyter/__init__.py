"""Notebook servers in Slurm jobs: find them in job output, then tunnel to them.

Kept empty so that importing :mod:`hpclaunch.jupyter.banner` stays cheap (no paramiko, no jinja2).
"""
