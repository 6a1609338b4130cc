"""The ride contract: what every deployable agrees on, defined once.

- ``ride_contract.ride``: the ride request schema and its validation (pydantic only).
- ``ride_contract.coarse``: the backend's instant estimate (numpy only).
- ``ride_contract.result``: the result message the function publishes and the backend stores.
- ``ride_contract.outcome``: a ride's actual duration as the app reports it, and the completed ride
  (every answer and the actual duration) the backend publishes and the monitoring flow reads.
- ``ride_contract.quality``: live quality figures per answering model on completed rides.
- ``ride_contract.features``: the model's request-time features (numpy).
- ``ride_contract.serving_form``: scores a model's serving form, the arrays training writes
  from the fitted pipeline (numpy).
- ``ride_contract.sklearn_features``: the features as a scikit-learn pipeline step (training only).

Every logged model ships this package in its ``code/`` folder, and the serving
function validates, featurizes, scores and answers with the model's own copy, so
serving cannot drift from training. The function imports neither pandas nor
scikit-learn, and the backend only ``ride``, ``coarse``, ``result``, ``outcome`` and ``quality``: keep this
file free of imports.
"""
