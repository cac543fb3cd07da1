"""``p2pkv doctor``: checks, from one host, what breaks p2pkv clusters in practice.

``probe`` asks the network (directory, each data plane), ``checks`` turns the answers into
findings, ``report`` renders them (table or JSON), ``cli`` wires the subcommand.
"""
