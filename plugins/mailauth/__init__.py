"""Mail authentication: DKIM signing on the way out, SPF/DKIM/DMARC/ARC checks on the way in.

Two plugins share this package, because an operator may want either alone:

* ``dkim-sign`` (:mod:`.sign_plugin`, sections ``[dkim]`` and ``[arc]``): signs mail from
  authenticated users and trusted networks at the client stage, after every filter, and seals
  relayed mail with ARC; ``relay dkim keygen`` makes keys and prints the DNS records.
* ``mailauth`` (:mod:`.check_plugin`, sections ``[mailauth]``, ``[spf]``, ``[dmarc]``): SPF at
  MAIL FROM, DKIM, ARC and DMARC after DATA, one ``Authentication-Results`` header, and the
  operator's policy for failures and DNS trouble.

Every DNS query goes through the relay's shared resolver (:mod:`.dnsquery`).
"""
