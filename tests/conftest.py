"""Shared fixtures: built-in tiny teachers (built once per session) and offline environment."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations pings the network on import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teacher():
    from teachers.load import load_teacher

    return load_teacher("tiny")


@pytest.fixture(scope="session")
def tiny_xl_teacher():
    from teachers.load import load_teacher

    return load_teacher("tiny-xl")
