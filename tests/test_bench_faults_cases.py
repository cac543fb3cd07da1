"""``p2pkv bench faults --cases``: which vLLM fault cases a (split) run makes, in which order,
and which documents each uses (its own, whichever cases run with it). Pure: no vLLM."""

from __future__ import annotations

import argparse

import pytest

from p2pkv.bench import faults
from p2pkv.bench.faults import vllm as faults_vllm


def test_all_cases_by_default_in_their_order():
    assert faults_vllm.select_cases(None) == faults_vllm.CASES
    assert faults_vllm.select_cases("all") == faults_vllm.CASES
    assert faults_vllm.CASES[-1] == "SIGKILL"  # B is not restarted: nothing may follow it


def test_named_cases_run_in_the_usual_order_whatever_order_they_are_named_in():
    assert faults_vllm.select_cases("SIGKILL, directory") == ("directory", "SIGKILL")
    assert faults_vllm.select_cases("sigstop,LOAD") == ("load", "SIGSTOP")
    assert faults_vllm.select_cases("load,load") == ("load",)


@pytest.mark.parametrize("spec", ["", " , ", "SIGTERM", "load,flood"])
def test_unknown_or_empty_names_are_refused_naming_the_choices(spec):
    with pytest.raises(ValueError, match="choose from load, SIGSTOP, directory, SIGKILL"):
        faults_vllm.select_cases(spec)


def test_a_case_keeps_its_own_documents_in_a_split_run():
    docs = {c: {d for d, _ in faults_vllm._prompts(faults_vllm.CASES.index(c))}
            for c in faults_vllm.CASES}
    assert all(len(d) == faults_vllm.DOCS_PER_CASE for d in docs.values())
    assert len(set().union(*docs.values())) == faults_vllm.DOCS_PER_CASE * len(docs)


def test_the_flag_parses():
    p = argparse.ArgumentParser()
    faults.add_args(p)
    assert p.parse_args([]).cases is None
    args = p.parse_args(["--only-vllm", "--cases", "directory,SIGKILL"])
    assert faults_vllm.select_cases(args.cases) == ("directory", "SIGKILL")
