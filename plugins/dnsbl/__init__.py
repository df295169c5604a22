"""``dnsbl``: refuse (or tag) clients that DNS block lists name, as E-MailRelay's ``--dnsbl``.

    [dnsbl]
    servers = ["zen.spamhaus.org", "bl.spamcop.net"]
    threshold = 1            # lists that must name the client; 0 = look up and log only
    timeout = 5              # seconds for all lookups of one connection; then fail open
    mode = "reject"          # 554 5.7.1 at connect; "tag": accept and add X-DNSBL headers
    allow = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
             "169.254.0.0/16", "fe80::/10", "fc00::/7"]   # the default; [] checks every client

``--dnsbl zen.spamhaus.org,bl.spamcop.net,1,5000,127.0.0.1:53`` sets ``spec``, which is
E-MailRelay's string (see :mod:`.settings`).
"""
