"""The compute node of a running job, for any tool: extra ports, a shell in the allocation, and SSH
clients (VS Code) reaching the node.

Everything goes through the transport's ``run``, ``run_attached``, ``forward`` and files, so it works
the same from a login node and over SSH. One module per concept: :mod:`.target` (which node, whose
job), :mod:`.ports` (forwards), :mod:`.shell` (job steps), :mod:`.stepsshd` (the per-job sshd),
:mod:`.sshentry` (the user's ssh config), :mod:`.hold` (a job that holds an allocation for VS Code).
"""
