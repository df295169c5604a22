"""The ``admin`` plugin: a web UI and a JSON API for operators and programs (``--admin PORT``).

``plugin`` wires it into the relay, ``server`` runs cheroot in threads, ``app`` is the Flask
application (authentication, headers, errors), ``api`` and ``ui`` its routes, ``auth`` and
``tokens`` the logins, ``events`` the recent events, ``queue_view``, ``compose`` and
``config_edit`` what the routes do.
"""
