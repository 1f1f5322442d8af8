"""Git: the one package that imports pygit2.

Takes repository URLs, auth and trust settings; produces commit ids, trees
read as a Snapshot, fetched and pushed refs and report-branch commits as
plain Python values. Every pygit2 error is mapped to a SourceError at this
boundary.
"""
