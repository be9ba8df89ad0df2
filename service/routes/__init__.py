"""The gateway's routes, one module per resource: render (counterfactuals and generation), jobs, models and
operations (health, readiness, metrics). service.api joins them."""
