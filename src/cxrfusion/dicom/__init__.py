"""DICOM results and PACS intake: TID 1500 SR and secondary capture per radiograph, input selection
rules, DICOMweb polling and a C-STORE listener, with SQLite state and a JSON-lines audit log."""
