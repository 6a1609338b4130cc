"""The ride contract: what every deployable agrees on, defined once.

- ``ride_contract.ride``: the ride request schema and its validation (pydantic only).
- ``ride_contract.coarse``: the backend's instant estimate (numpy only).
- ``ride_contract.result``: the result message the function publishes and the backend stores.
- ``ride_contract.features``: the model's request-time features (pandas, scikit-learn).

Every logged model ships this package in its ``code/`` folder, and the serving
function validates, featurizes and answers with the model's own copy, so serving
cannot drift from training. The backend imports only ``ride``, ``coarse`` and
``result``, so its image needs neither pandas nor scikit-learn: keep this file
free of imports.
"""
