"""Ray's notice that token authentication is on is dropped for a local instance the run starts; its warning that
authentication is off never is."""

import logging

from gmner_pipeline.ray_local import local_auth_mode

NAME = "ray._private.authentication.authentication_token_setup"


def test_only_the_auth_enabled_notice_is_dropped(caplog):
    logger = logging.getLogger(NAME)
    with caplog.at_level(logging.WARNING, logger=NAME):
        with local_auth_mode():
            logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
            logger.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
        logger.warning("Token authentication is enabled for this Ray cluster. (outside a local run)")
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.endswith("disabled ...") for m in messages)
    assert any("is disabled" in m for m in messages)
    assert any("outside a local run" in m for m in messages)  # the filter is removed afterwards
