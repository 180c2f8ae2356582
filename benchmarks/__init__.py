"""Speed and build checks of the project, run from the repository root as ``python -m benchmarks.<script>``.

Every script opens its model as users do (utils.plan: Plan.resolve -> prepare -> open / utils.run's
executors); benchmarks.common holds what several of them share.
"""
