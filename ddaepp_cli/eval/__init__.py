"""Evaluation of trained runs: frozen features through the tap API (`features`), linear probes (`probe`,
`probesources`, `latentprobe`), dense probes (`segprobe`, `segdata`, `seglatent`), CKA (`cka`), DDAE's
alignment / uniformity and noise-conditional classifier (`analysis`), generation quality (`fid/`,
`inception`), and the records and plots every evaluation writes (`evalrecord`, `plots`)."""
