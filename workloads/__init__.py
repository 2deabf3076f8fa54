"""Lambda-shaped handler modules lambdaemu runs (`--handler workloads.<name>:handler`).

Each reads its settings from environment variables, as a Lambda function reads its configuration, and
needs no lambdaemu import. Nothing is imported here: importing a workload module is an environment's
init phase.
"""
