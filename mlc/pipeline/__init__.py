"""`mlc compress`: the stages of a run (:mod:`.stages`), what a stage is and how its completeness is
recorded (:mod:`.stage`), the order of work (:mod:`.run`) and the command (:mod:`.commands`)."""
