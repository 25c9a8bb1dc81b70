"""The commands that are not pipeline stages: ``fgpipe predict``, ``fgpipe show`` and ``fgpipe localize``.

They read the stages' artefacts (checked as the stages check them) and write none of them: nothing in dvc.yaml runs
them. The stages live in :mod:`fgpipe.stages`.
"""
