"""``footfall-agent run`` around the stages: the spool, the publisher, metrics, Home Assistant.

:mod:`.run` reads a source through the pipeline into the spool; :mod:`.publish` sends the spool
over MQTT until the aggregator's receipts cover it.
"""
