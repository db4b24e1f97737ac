"""The DVC stages, one module each (dvc.yaml runs `versvideo stage NAME`, which calls NAME.main).

A stage is a leaf: it reads its params section and its inputs, calls the shared packages beside
this one, and writes its outputs. No module of the project imports a stage
(tests/tasks/test_layout.py checks it), so editing one stage never changes another."""
