"""Studies that combine the layers below: the synthetic world's files (:mod:`.world_files`), its
evaluation (:mod:`.world_evaluation`), the alignment stages (:mod:`.stages`), the analyses they run
(:mod:`.analyses`, on the world or on a benchmark file: :mod:`.corpus`) and the demo (:mod:`.demo`). Nothing below this package imports it."""
